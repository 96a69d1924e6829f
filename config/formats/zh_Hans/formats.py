"""The console's one date format: the same as English (config/formats/en)."""

from config.formats.en.formats import *  # noqa: F403
