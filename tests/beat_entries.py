"""Beat entries a team's module adds, loaded by beat in tests via KIT_TASK_MODULES.

KIT_TEST_CRONTAB="HH:MM" adds a crontab entry for that local time (in KIT_TIMEZONE)
through the kit's hook; KIT_TEST_EVERY="S" an entry every S seconds
(``test.every``: ``test.record`` on the default queue); KIT_TEST_REPLACE_BEAT_SCHEDULE=1
replaces the whole schedule instead, as a tutorial's ``app.conf.beat_schedule = {...}`` does.
"""

from __future__ import annotations

import os

from celery.schedules import crontab

from service.app import add_beat_entry, app

if os.environ.get("KIT_TEST_CRONTAB"):
    hour, minute = os.environ["KIT_TEST_CRONTAB"].split(":")
    add_beat_entry("test.crontab_probe", "test.record_waits", crontab(hour=hour, minute=minute), args=("cron",))

if os.environ.get("KIT_TEST_EVERY"):
    add_beat_entry("test.every", "test.record", float(os.environ["KIT_TEST_EVERY"]), args=("every",), queue="default")

if os.environ.get("KIT_TEST_REPLACE_BEAT_SCHEDULE"):
    app.conf.beat_schedule = {"test.replaced": {"task": "test.record", "schedule": 3600.0, "args": ("r",)}}
