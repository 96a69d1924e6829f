"""The console in a real browser: headless Chromium (Debian's) driven by Playwright.

An operator logs in, restarts an instance from the instance actions, watches the
task's progress bar move without reloading the page, cancels the running task
through the cancel action with a reason, and sees it end cancelled. A screenshot
of the dashboard is saved to artifacts/dashboard.png; test_operator_works_in_chinese does the
same in Simplified Chinese (artifacts/dashboard-zh.png). test_operator_triage_jobs walks
the operator's jobs of issue 23 at 1440 px, 390 px and in dark mode, with screenshots in
var/screenshots (SCREENSHOTS_DIR).

The live server runs in a thread of this process (Django's LiveServerThread, each
request on its own connection); a second thread plays the worker tier
(tasks.engine.worker.run_admitted_inline in a loop). On SQLite the test runs on a file
copy of the test database (see threaded_db). The restart operation is replaced
by a slow, test-only one (progress 5, 10, ... 100, half a second apart) so the test
does not depend on the simulated provider's timing.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.db import connection, connections
from django.test.testcases import LiveServerThread
from django.utils import timezone

from tasks.engine.states import InstanceStatus, TaskType
from tasks.models import Instance, Provider, Task
from tasks.operations import _REGISTRY, get_operation
from tasks.operations.base import ExecutionContext, Operation

pytestmark = [pytest.mark.browser]

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
REASON = "customer asked to stop the reboot"


class SlowRestart(Operation):
    """Twenty steps of 5 %, half a second apart: about ten seconds unless cancelled."""

    task_type = TaskType.RESTART
    success_status = InstanceStatus.RUNNING

    def run(self, ctx: ExecutionContext) -> None:
        for percent in range(5, 101, 5):
            ctx.progress(percent, f"step {percent // 5} of 20")
            ctx.cancel.sleep(0.5)  # raises OperationCancelled once the cancel is seen


class InlineWorkers(threading.Thread):
    """The worker tier: admit and run pending tasks of one provider until stopped."""

    def __init__(self, provider_id: int):
        super().__init__(name="inline-workers", daemon=True)
        self.provider_id = provider_id
        self.halt = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        from tasks.engine.worker import run_admitted_inline

        try:
            while not self.halt.is_set():
                try:
                    run_admitted_inline(self.provider_id)
                except Exception as exc:  # keep serving; the test reports it
                    self.errors.append(exc)
                self.halt.wait(0.2)
        finally:
            connection.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=15)


@pytest.fixture
def slow_restart(monkeypatch):
    get_operation(TaskType.RESTART)  # load the real registry first, then replace one entry
    monkeypatch.setitem(_REGISTRY, TaskType.RESTART, SlowRestart())


@pytest.fixture
def threaded_db(transactional_db, tmp_path):
    """A database every thread can write to at once, each with its own connection.

    The default SQLite test database lives in memory, shared between threads through
    SQLite's shared cache, where a writer makes the others fail at once with "database
    table is locked" (no busy wait). The live server, the worker loop and the worker's
    heartbeat all write, so this test copies the migrated in-memory database to a file
    (WAL, busy timeout: the production set-up) for its duration. MariaDB and file
    databases are used as they are.
    """
    conn = connections["default"]
    if conn.vendor != "sqlite" or not conn.is_in_memory_db():
        yield
        return
    conn.ensure_connection()
    memory = conn.connection
    path = tmp_path / "browser.sqlite3"
    target = sqlite3.connect(path)
    memory.backup(target)
    target.close()
    original_name = conn.settings_dict["NAME"]
    # Detach (not close: closing would destroy the in-memory database) and repoint.
    # The settings dict is shared with every thread's new connection.
    conn.connection = None
    conn.settings_dict["NAME"] = str(path)
    try:
        yield
    finally:
        conn.close()
        conn.settings_dict["NAME"] = original_name
        conn.connection = memory


@pytest.fixture
def console_url(threaded_db):
    """A live server whose request threads each open their own database connection."""
    server = LiveServerThread("localhost", StaticFilesHandler)
    server.daemon = True
    server.start()
    server.is_ready.wait()
    if server.error:
        raise server.error
    yield f"http://{server.host}:{server.port}"
    server.terminate()


@pytest.fixture
def provider_row(threaded_db):
    return Provider.objects.create(name="sim-browser", provider_type="simulated")


@pytest.fixture
def workers(console_url, provider_row):
    tier = InlineWorkers(provider_row.pk)
    tier.start()
    yield tier
    tier.stop()
    assert not tier.is_alive(), "the inline worker thread did not stop"


@pytest.fixture
def browser_page(threaded_db, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (scripts/setup browser installs Debian's)"
        if os.environ.get("REQUIRE_BROWSER"):  # CI: a missing browser is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    # Playwright's sync API runs an event loop in this thread; the test's own ORM
    # calls are synchronous and safe here.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(15_000)
        try:
            yield page
        finally:
            context.close()
            browser.close()
            # While Playwright runs, asgiref's context-local storage hands this thread a
            # different connection object than before it started; close it here, in
            # that context, so it does not stay open on this test's file database.
            connections.close_all()


def seed_history(instance: Instance, count: int = 240) -> None:
    """Finished tasks spread over the last six hours, so the charts have something to draw."""
    rng = random.Random(6)
    now = timezone.now()
    rows = []
    for _ in range(count):
        task_type = rng.choice([TaskType.START, TaskType.STOP, TaskType.RESTART, TaskType.CREATE, TaskType.RESET])
        status = rng.choices(["completed", "failed", "timeout", "cancelled"], weights=[85, 8, 3, 4])[0]
        run = timedelta(seconds=rng.lognormvariate(2.5 if task_type != TaskType.CREATE else 3.5, 0.5))
        completed = now - timedelta(seconds=rng.uniform(30, 6 * 3600))
        rows.append(
            Task(
                task_type=task_type,
                status=status,
                progress=100 if status == "completed" else rng.randint(5, 95),
                owner_id=instance.owner_id,
                initiator_id=instance.owner_id,
                provider_id=instance.provider_id,
                instance=instance,
                created_at=completed - run - timedelta(seconds=rng.uniform(0, 20)),
                started_at=completed - run,
                completed_at=completed,
            )
        )
    Task.objects.bulk_create(rows)


def progress_value(page, task_id: int) -> int | None:
    bar = page.locator(f'[data-role="progress"][data-task-id="{task_id}"]').first
    value = bar.get_attribute("aria-valuenow")
    return int(value) if value is not None else None


def test_operator_restarts_watches_and_cancels(console_url, browser_page, workers, provider_row, slow_restart):
    from playwright.sync_api import expect

    page = browser_page
    get_user_model().objects.create_user("root", "root@example.com", "root-pass-123", is_staff=True, is_superuser=True)
    alice = get_user_model().objects.create_user("alice", "alice@example.com", "alice-pass-123")
    instance = Instance.objects.create(
        owner=alice, provider=provider_row, name="web-1", live_name="web-1", image="debian/12", status="running"
    )

    # Log in.
    page.goto(f"{console_url}/admin/login/?next=/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", "root-pass-123")
    page.click('input[type="submit"]')
    expect(page.locator("#task-console")).to_be_visible()

    # Restart the instance from the instance actions.
    page.goto(f"{console_url}/admin/tasks/instance/")
    page.check(f'input[name="_selected_action"][value="{instance.pk}"]')
    page.select_option('select[name="action"]', "restart_instances")
    page.click('button[name="index"]')
    expect(page.locator(".messagelist")).to_contain_text("Restart: 1 done, 0 skipped")
    task = Task.objects.get(instance=instance, task_type=TaskType.RESTART)

    # Watch its progress bar move on the task list, without a reload.
    page.goto(f"{console_url}/admin/tasks/task/")
    page.evaluate("window.__sameDocument = true")
    seen: list[int] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and len(set(seen) - {0}) < 2:
        value = progress_value(page, task.pk)
        if value is not None and (not seen or seen[-1] != value):
            seen.append(value)
        time.sleep(0.2)
    assert len(set(seen) - {0}) >= 2, f"progress bar values seen: {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert page.evaluate("window.__sameDocument") is True  # updated in place
    expect(page.locator(f'[data-role="badge"][data-task-id="{task.pk}"]')).to_have_text("Running")

    # Cancel it through the cancel action, giving a reason on the confirmation page.
    page.check(f'input[name="_selected_action"][value="{task.pk}"]')
    page.select_option('select[name="action"]', "cancel_selected")
    page.click('button[name="index"]')
    expect(page.locator("h1")).to_have_text("Cancel tasks")
    page.fill('textarea[name="reason"]', REASON)
    page.click('input[name="_confirm"]')
    expect(page.locator(".messagelist")).to_contain_text("Cancel: 1 done, 0 skipped")
    # The worker sees the request within about a second; the badge follows without a reload.
    page.evaluate("window.__sameDocument = true")
    expect(page.locator(f'[data-role="badge"][data-task-id="{task.pk}"]')).to_have_text("Cancelled", timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True

    task.refresh_from_db()
    assert (task.status, task.error_code, task.cancel_reason) == ("cancelled", "cancelled_by_admin", REASON)
    assert 0 < task.progress < 100
    actors = list(task.events.filter(kind="transition").values_list("to_status", "actor"))
    assert ("cancelling", "admin:root") in actors and actors[-1][0] == "cancelled"

    # The task page shows the reason in its timeline.
    page.goto(f"{console_url}/admin/tasks/task/{task.pk}/change/")
    expect(page.locator("#timeline")).to_contain_text(REASON)

    # A screenshot of the dashboard (with some history behind it), kept as a test artifact.
    seed_history(instance)
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    expect(page.locator("#tc-status svg")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert not workers.errors, workers.errors


def test_operator_works_in_chinese(console_url, browser_page, workers, provider_row, slow_restart):
    """The same console in Simplified Chinese, chosen with the header's language switch:
    actions, confirmation, live badges and the dashboard; a screenshot of the dashboard
    is saved to artifacts/dashboard-zh.png."""
    from playwright.sync_api import expect

    page = browser_page
    get_user_model().objects.create_user("root", "root@example.com", "root-pass-123", is_staff=True, is_superuser=True)
    alice = get_user_model().objects.create_user("alice", "alice@example.com", "alice-pass-123")
    instance = Instance.objects.create(
        owner=alice, provider=provider_row, name="web-1", live_name="web-1", image="debian/12", status="running"
    )

    # The login page (English: the browser asks for en-US) has the switch; choose Chinese there.
    page.goto(f"{console_url}/admin/login/?next=/admin/")
    page.select_option("#tc-language-select", "zh-hans")
    page.click("#tc-language button")
    expect(page.locator('input[type="submit"]')).to_have_value("登录")
    page.fill("#id_username", "root")
    page.fill("#id_password", "root-pass-123")
    page.click('input[type="submit"]')
    expect(page.locator("#task-console h2")).to_have_text("任务控制台")

    # Restart the instance from the instance actions (labels in Chinese, action names unchanged).
    page.goto(f"{console_url}/admin/tasks/instance/")
    page.check(f'input[name="_selected_action"][value="{instance.pk}"]')
    expect(page.locator('select[name="action"] option[value="restart_instances"]')).to_have_text("重启所选实例")
    page.select_option('select[name="action"]', "restart_instances")
    page.click('button[name="index"]')
    expect(page.locator(".messagelist")).to_contain_text("重启：完成 1 个，跳过 0 个")
    task = Task.objects.get(instance=instance, task_type=TaskType.RESTART)

    # The badge turns "running" in Chinese, in place.
    page.goto(f"{console_url}/admin/tasks/task/")
    expect(page.locator(f'[data-role="badge"][data-task-id="{task.pk}"]')).to_have_text("运行中", timeout=10_000)

    # Cancel it with a reason on the Chinese confirmation page; the badge follows without a reload.
    page.check(f'input[name="_selected_action"][value="{task.pk}"]')
    page.select_option('select[name="action"]', "cancel_selected")
    page.click('button[name="index"]')
    expect(page.locator("h1")).to_have_text("取消任务")
    expect(page.locator('input[name="_confirm"]')).to_have_value("取消这些任务")
    page.fill('textarea[name="reason"]', REASON)
    page.click('input[name="_confirm"]')
    expect(page.locator(".messagelist")).to_contain_text("取消：完成 1 个，跳过 0 个")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator(f'[data-role="badge"][data-task-id="{task.pk}"]')).to_have_text("已取消", timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True
    task.refresh_from_db()
    assert (task.status, task.error_code, task.cancel_reason) == ("cancelled", "cancelled_by_admin", REASON)

    # The dashboard in Chinese, with some history behind it.
    seed_history(instance)
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    expect(page.locator("h1")).to_have_text("任务仪表盘")
    expect(page.locator("#tc-status h2")).to_have_text("各状态任务数")
    expect(page.locator("#tc-status svg")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-zh.png"), full_page=True)
    assert (ARTIFACTS / "dashboard-zh.png").stat().st_size > 10_000
    assert not workers.errors, workers.errors


# ------------------------------------------------------------------ the operator's jobs (issue 23)

SCREENSHOTS = Path(os.environ.get("SCREENSHOTS_DIR", Path(__file__).resolve().parents[2] / "var" / "screenshots"))
CUSTOMERS = ("alice", "bob", "carol", "dave", "erin")


def seed_console(now):
    """5 simulated providers, 6 users, about 100 tasks: history with failures in the last
    hour, a provider of one slot with a running task and pending tasks behind it, and a
    provider held unreachable with a task waiting on it."""
    users = [get_user_model().objects.create_user(name, f"{name}@example.com", "pass-123") for name in CUSTOMERS]
    providers = [
        Provider.objects.create(name=f"sim-{i}", provider_type="simulated", max_concurrent_tasks=4) for i in range(1, 6)
    ]
    single = providers[0]
    Provider.objects.filter(pk=single.pk).update(allow_concurrent_tasks=False)
    down = providers[4]
    Provider.objects.filter(pk=down.pk).update(
        unreachable_since=now - timedelta(minutes=7), unreachable_error="no route"
    )
    instances = [
        Instance.objects.create(
            owner=user,
            provider=providers[i % 5],
            name=f"{user.username}-{i}",
            live_name=f"{user.username}-{i}",
            image="debian/12",
            status="running",
        )
        for i, user in enumerate(users * 3)
    ]
    rng = random.Random(23)
    history = []
    for n in range(90):
        inst = instances[n % len(instances)]
        status = "failed" if n % 9 == 0 else rng.choice(["completed"] * 6 + ["cancelled"])
        completed = now - timedelta(minutes=rng.uniform(2, 110))
        history.append(
            Task(
                task_type=rng.choice([TaskType.START, TaskType.STOP, TaskType.RESTART]),
                status=status,
                progress=100 if status == "completed" else 60,
                status_message="cleanup: releasing the address",
                error_code="provider_error" if status == "failed" else "",
                error_message=f"simulated host rejected the request (case {n})" if status == "failed" else "",
                owner_id=inst.owner_id,
                initiator_id=inst.owner_id,
                provider_id=inst.provider_id,
                instance=inst,
                created_at=completed - timedelta(seconds=40),
                started_at=completed - timedelta(seconds=30),
                completed_at=completed,
            )
        )
    Task.objects.bulk_create(history)
    on_single = [i for i in instances if i.provider_id == single.pk]

    def active(inst, status, minutes, **fields):
        return Task.objects.create(
            task_type=TaskType.RESTART,
            status=status,
            owner_id=inst.owner_id,
            initiator_id=inst.owner_id,
            provider_id=inst.provider_id,
            instance=inst,
            created_at=now - timedelta(minutes=minutes),
            **fields,
        )

    holder = active(
        on_single[0],
        "running",
        9,
        admitted_at=now - timedelta(minutes=9),
        started_at=now - timedelta(minutes=8),
        progress=30,
        status_message="rebooting",
        lease_token="t" * 32,
        lease_expires_at=now + timedelta(hours=1),
    )
    behind = [active(on_single[k % len(on_single)], "pending", 6 - k) for k in range(4)]
    stranded = active(next(i for i in instances if i.provider_id == down.pk), "pending", 5)
    runaway = active(
        instances[1],
        "running",
        12,
        admitted_at=now - timedelta(minutes=12),
        started_at=now - timedelta(minutes=11),
        progress=50,
        status_message="copying the image",
        lease_token="r" * 32,
        lease_expires_at=now + timedelta(hours=1),
    )
    return {
        "single": single,
        "down": down,
        "holder": holder,
        "behind": behind,
        "stranded": stranded,
        "runaway": runaway,
    }


WIDEST = """() => {
  const width = document.documentElement.clientWidth;
  return [...document.querySelectorAll("body *")]
    .filter(e => e.getBoundingClientRect().right > width + 1)
    .slice(-5)
    .map(e => `${e.tagName}.${e.className} ${Math.round(e.getBoundingClientRect().right)}px`);
}"""


def no_sideways_scroll(page) -> bool:
    """The page fits its viewport's width (else the widest elements are printed, for the report)."""
    fits = page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    if not fits:
        print("wider than the viewport:", page.evaluate(WIDEST))
    return fits


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two CSS rgb()/rgba() colours."""

    def luminance(css: str) -> float:
        parts = [float(p) for p in css[css.index("(") + 1 : css.index(")")].replace("/", ",").split(",")[:3]]
        lin = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in parts]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    assert (SCREENSHOTS / f"{name}.png").stat().st_size > 5_000


def test_operator_triage_jobs(console_url, browser_page):
    """Find why a task waits, triage the last hour's failures, force-stop a running task,
    raise a provider's limit, resume a held provider; the task list at 1440 px without
    sideways scrolling, the task page and dashboard at 390 px, and dark mode, with
    screenshots in var/screenshots (SCREENSHOTS_DIR)."""
    from playwright.sync_api import expect

    page = browser_page
    now = timezone.now()
    get_user_model().objects.create_user("root", "root@example.com", "root-pass-123", is_staff=True, is_superuser=True)
    seeded = seed_console(now)
    assert get_user_model().objects.count() == 6 and 95 <= Task.objects.count() <= 105

    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{console_url}/admin/login/?next=/admin/")
    page.fill("#id_username", "root")
    page.fill("#id_password", "root-pass-123")
    page.click('input[type="submit"]')
    expect(page.locator("#task-console")).to_be_visible()

    # 1. Why does a task wait? Its row names the slot and the task holding it; follow the link.
    page.goto(f"{console_url}/admin/tasks/task/")
    assert no_sideways_scroll(page), "the task list scrolls sideways at 1440 px"
    # Nor does the table inside its own scroll box (the admin's .results).
    widths = page.evaluate(
        "[...document.querySelectorAll('#result_list thead th')].map(th => th.className + ' ' + th.offsetWidth)"
        " .concat([document.querySelector('#changelist .results').scrollWidth,"
        " document.querySelector('#changelist .results').clientWidth])"
    )
    assert widths[-2] <= widths[-1], f"the table scrolls in its box at 1440 px: {widths}"
    shot(page, "task-list-1440")
    last = seeded["behind"][-1]
    row = page.locator("#result_list tr", has=page.locator(f'a[href$="/tasks/task/{last.pk}/change/"]'))
    expect(row.locator(".field-note_col")).to_contain_text("slot 1/1")
    expect(row.locator(".field-note_col")).to_contain_text("#4")
    stranded = page.locator(
        "#result_list tr", has=page.locator(f'a[href$="/tasks/task/{seeded["stranded"].pk}/change/"]')
    )
    expect(stranded.locator(".field-note_col")).to_contain_text("unreachable")
    row.locator(f'.field-note_col a[href$="/tasks/task/{seeded["holder"].pk}/change/"]').click()
    expect(page.locator("h1")).to_have_text("View task")
    expect(page.locator("#content")).to_contain_text("rebooting")

    # 2. Triage the last hour's failures: the error-code filter, then finished in the last hour.
    page.goto(f"{console_url}/admin/tasks/task/")
    page.locator("#changelist-filter a", has_text="Provider error").first.click()
    page.locator("#changelist-filter a", has_text="last hour").first.click()
    expect(page).to_have_url(re.compile(r"error_code=provider_error"))
    expect(page).to_have_url(re.compile(r"finished=1h"))
    expected = Task.objects.filter(
        error_code="provider_error", completed_at__gte=timezone.now() - timedelta(hours=1)
    ).count()
    assert expected > 0
    expect(page.locator("#result_list tbody tr")).to_have_count(expected)
    expect(page.locator("#result_list tbody tr").first.locator(".tc-error")).to_contain_text("simulated host rejected")
    assert no_sideways_scroll(page)
    shot(page, "triage-last-hour-1440")

    # Dark mode: the force-stop button on a running task's page must be readable.
    runaway = seeded["runaway"]
    page.emulate_media(color_scheme="dark")
    page.goto(f"{console_url}/admin/tasks/task/{runaway.pk}/change/")
    button = page.locator("a.tc-tool--danger")
    expect(button).to_be_visible()
    fg, bg = button.evaluate("b => [getComputedStyle(b).color, getComputedStyle(b).backgroundColor]")
    assert contrast(fg, bg) >= 4.5, (fg, bg)
    shot(page, "task-page-dark")
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    expect(page.locator("#tc-health")).to_be_visible()
    shot(page, "dashboard-dark")
    page.emulate_media(color_scheme="light")

    # 3. Force-stop the running task, with a reason.
    page.goto(f"{console_url}/admin/tasks/task/{runaway.pk}/change/")
    page.click("a.tc-tool--danger")
    page.fill('textarea[name="reason"]', "stuck copying the image")
    page.click('input[name="_confirm"]')
    expect(page.locator(".messagelist")).to_contain_text("1 done")
    runaway.refresh_from_db()
    assert (runaway.status, runaway.error_code) == ("cancelled", "force_stopped")

    # 4. Raise a provider's limit.
    single = seeded["single"]
    page.goto(f"{console_url}/admin/tasks/provider/{single.pk}/change/")
    page.check("#id_allow_concurrent_tasks")
    page.fill("#id_max_concurrent_tasks", "3")
    page.click('input[name="_save"]')
    expect(page.locator(".messagelist")).to_be_visible()
    single.refresh_from_db()
    assert (single.allow_concurrent_tasks, single.max_concurrent_tasks, single.concurrency_limit) == (True, 3, 3)

    # 5. Resume the held provider: the health strip leads to it; the connectivity check resumes it.
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    expect(page.locator("#tc-health-unreachable .tc-health__value")).to_have_text("1")
    page.click("#tc-health-unreachable")
    down = seeded["down"]
    page.check(f'input[name="_selected_action"][value="{down.pk}"]')
    page.select_option('select[name="action"]', "check_connectivity")
    page.click('button[name="index"]')
    expect(page.locator(".messagelist")).to_be_visible()
    down.refresh_from_db()
    assert down.unreachable_since is None

    shot(page, "providers-1440")
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    shot(page, "dashboard-1440")

    # Phones: the task page and the dashboard at 390 px, without sideways scrolling.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{console_url}/admin/tasks/task/{seeded['holder'].pk}/change/")
    assert no_sideways_scroll(page), "the task page scrolls sideways at 390 px"
    shot(page, "task-page-390")
    page.goto(f"{console_url}/admin/tasks/task/dashboard/")
    assert no_sideways_scroll(page), "the dashboard scrolls sideways at 390 px"
    shot(page, "dashboard-390")
