"""Small server-side SVG charts for the dashboard (no JavaScript, no third-party code).

Each function returns a complete inline <svg> as a SafeString. Colours come from
CSS classes in tasks/static/tasks/admin.css, so the charts follow the admin's
light and dark themes. Every bar has a <title> (the browser's tooltip), and the
caller shows the same figures in a table for screen readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext as _


@dataclass
class Bar:
    label: str
    value: float
    css: str = ""
    title: str = ""
    text: str = ""  # shown after the bar; defaults to the value


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _svg(width: int, height: int, label: str, body: list[str]) -> SafeString:
    return mark_safe(
        f'<svg class="tc-chart" viewBox="0 0 {width} {height}" width="100%" '
        f'preserveAspectRatio="xMinYMin meet" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )


def hbars(
    bars: Sequence[Bar], *, label: str, width: int = 520, row: int = 22, label_width: int = 130, value_width: int = 70
) -> SafeString:
    """Horizontal bars, one per row, scaled to the largest value."""
    height = max(row, row * len(bars)) + 4
    top = max((b.value for b in bars), default=0) or 1
    track = width - label_width - value_width
    body = []
    for i, bar in enumerate(bars):
        y = i * row + 2
        w = 0 if bar.value <= 0 else max(1.5, track * bar.value / top)
        tip = escape(bar.title or f"{bar.label}: {_num(bar.value)}")
        body.append(
            f'<g class="tc-chart__row"><title>{tip}</title>'
            f'<text class="tc-chart__label" x="{label_width - 6}" y="{y + row * 0.68:.1f}" text-anchor="end">'
            f"{escape(bar.label)}</text>"
            f'<rect class="tc-chart__track" x="{label_width}" y="{y + 3}" width="{track}" height="{row - 8}" rx="2"/>'
            f'<rect class="tc-fill {escape(bar.css)}" x="{label_width}" y="{y + 3}" width="{w:.1f}" '
            f'height="{row - 8}" rx="2"/>'
            f'<text class="tc-chart__value" x="{label_width + w + 5:.1f}" y="{y + row * 0.68:.1f}">'
            f"{escape(bar.text or _num(bar.value))}</text></g>"
        )
    return _svg(width, height, label, body)


@dataclass
class QueueRow:
    label: str
    running: int
    pending: int
    limit: int
    enabled: bool = True


def queues(rows: Sequence[QueueRow], *, label: str, width: int = 520, row: int = 26, label_width: int = 130):
    """Per provider: running (solid) and pending (hatched) tasks, and a mark at the limit."""
    height = max(row, row * len(rows)) + 4
    scale = max((max(r.limit, r.running + r.pending) for r in rows), default=1) or 1
    track = width - label_width - 110
    unit = track / scale
    body = [
        '<defs><pattern id="tc-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect class="tc-fill tc-s-pending" width="3" height="6"/></pattern></defs>'
    ]
    for i, r in enumerate(rows):
        y = i * row + 2
        x_run = label_width + r.running * unit
        x_limit = label_width + r.limit * unit
        state = "" if r.enabled else " " + _("(disabled)")
        value = _("%(running)s/%(limit)s · %(pending)s pending") % {
            "running": r.running,
            "limit": r.limit,
            "pending": r.pending,
        }
        tip = escape(
            f"{r.label}{state}: "
            + _("%(running)s running of %(limit)s allowed, %(pending)s pending")
            % {"running": r.running, "limit": r.limit, "pending": r.pending}
        )
        body.append(
            f'<g class="tc-chart__row"><title>{tip}</title>'
            f'<text class="tc-chart__label" x="{label_width - 6}" y="{y + row * 0.65:.1f}" text-anchor="end">'
            f"{escape(r.label)}{escape(state)}</text>"
            f'<rect class="tc-chart__track" x="{label_width}" y="{y + 4}" width="{r.limit * unit:.1f}" '
            f'height="{row - 10}" rx="2"/>'
            f'<rect class="tc-fill tc-s-running" x="{label_width}" y="{y + 4}" width="{r.running * unit:.1f}" '
            f'height="{row - 10}" rx="2"/>'
            f'<rect fill="url(#tc-hatch)" class="tc-chart__pending" x="{x_run:.1f}" y="{y + 4}" '
            f'width="{r.pending * unit:.1f}" height="{row - 10}"/>'
            f'<line class="tc-chart__limit" x1="{x_limit:.1f}" x2="{x_limit:.1f}" y1="{y + 1}" y2="{y + row - 3}"/>'
            f'<text class="tc-chart__value" x="{label_width + track + 6}" y="{y + row * 0.65:.1f}">'
            f"{escape(value)}</text></g>"
        )
    return _svg(width, height, label, body)


@dataclass
class Series:
    key: str
    label: str
    css: str


def columns(
    buckets: Sequence[dict],
    series: Sequence[Series],
    *,
    label: str,
    x_labels: dict[int, str],
    width: int = 760,
    height: int = 200,
) -> SafeString:
    """Stacked columns over time (one per bucket), a light grid, and a legend."""
    left, right, top, bottom = 36, 8, 22, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(b.get(s.key, 0) for s in series) for b in buckets]
    ymax = _nice(max(totals, default=0))
    col = plot_w / max(1, len(buckets))
    body = _grid(left, top, plot_w, plot_h, ymax, width)
    for i, bucket in enumerate(buckets):
        y = top + plot_h
        x = left + i * col
        parts = []
        for s in series:
            value = bucket.get(s.key, 0)
            if not value:
                continue
            h = plot_h * value / ymax
            y -= h
            parts.append(
                f'<rect class="tc-fill {s.css}" x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(0.5, col - 1):.1f}" '
                f'height="{h:.1f}"/>'
            )
        if parts:
            tip = escape(
                f"{bucket['label']}: " + ", ".join(f"{bucket.get(s.key, 0)} {s.label.lower()}" for s in series)
            )
            body.append(f"<g><title>{tip}</title>{''.join(parts)}</g>")
    body += _x_labels(x_labels, left, col, top + plot_h + 15)
    body += _legend(series, left, 13)
    return _svg(width, height, label, body)


def line(
    points: Sequence[float | None],
    *,
    label: str,
    x_labels: dict[int, str],
    tips: Sequence[str],
    ymax: float = 100,
    unit: str = "%",
    css: str = "tc-s-failed",
    width: int = 760,
    height: int = 150,
) -> SafeString:
    """A line over time; None leaves a gap (no data in that bucket)."""
    left, right, top, bottom = 36, 8, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(1, len(points))
    body = _grid(left, top, plot_w, plot_h, ymax, width, unit=unit)
    path: list[str] = []
    dots: list[str] = []
    pen_up = True
    for i, value in enumerate(points):
        if value is None:
            pen_up = True
            continue
        x = left + (i + 0.5) * step
        y = top + plot_h - plot_h * min(value, ymax) / ymax
        path.append(f"{'M' if pen_up else 'L'}{x:.1f},{y:.1f}")
        pen_up = False
        dots.append(
            f'<circle class="tc-dot {css}" cx="{x:.1f}" cy="{y:.1f}" r="2.2"><title>{escape(tips[i])}</title></circle>'
        )
    if path:
        body.append(f'<path class="tc-line {css}" d="{" ".join(path)}"/>')
    body += dots
    body += _x_labels(x_labels, left, step, top + plot_h + 15)
    return _svg(width, height, label, body)


def _nice(value: float) -> float:
    """A round axis maximum at or above value (1, 2, 5 x 10^n)."""
    if value <= 0:
        return 1
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= value:
            return factor * magnitude
    return 10 * magnitude


def _grid(left: float, top: float, plot_w: float, plot_h: float, ymax: float, width: int, unit: str = "") -> list[str]:
    out = []
    for frac in (0, 0.5, 1):
        y = top + plot_h - plot_h * frac
        out.append(f'<line class="tc-chart__grid" x1="{left}" x2="{left + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="tc-chart__axis" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
            f"{_num(ymax * frac)}{unit}</text>"
        )
    return out


def _x_labels(labels: dict[int, str], left: float, step: float, y: float) -> list[str]:
    return [
        f'<text class="tc-chart__axis" x="{left + i * step:.1f}" y="{y:.1f}" text-anchor="middle">{escape(text)}</text>'
        for i, text in labels.items()
    ]


def _legend(series: Sequence[Series], x: float, y: float) -> list[str]:
    out = []
    for s in series:
        out.append(f'<rect class="tc-fill {s.css}" x="{x:.1f}" y="{y - 9}" width="10" height="10" rx="2"/>')
        label = str(s.label)
        out.append(f'<text class="tc-chart__label" x="{x + 14:.1f}" y="{y}">{escape(label)}</text>')
        # About 7 px per Latin character at the label's size, 13 per CJK one (twice as wide).
        x += 24 + sum(13 if ord(c) > 0x2E7F else 7 for c in label)
    return out
