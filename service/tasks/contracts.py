"""What publishers and tasks agree on: names, formats and limits of the work-log and notification tasks.

Imports nothing of the kit, so a publisher (the example web service) validates
its input against the very limits the tasks enforce without loading the Celery
app or any task code.
"""

from __future__ import annotations

import re

#: Task names.
WORK_LOGS_TASK = "reports.work_logs"
NOTIFICATION_TASK = "notifications.send"
CLEANUP_TASK = "maintenance.cleanup_reports"

#: Output formats of a work-log export.
EXPORT_FORMATS = ("csv", "xlsx")
#: Longest export, in days (both ends included).
MAX_EXPORT_DAYS = 366
#: Most employees one export may name.
MAX_EMPLOYEES = 200
#: What an employee id looks like (whether the directory knows it, only the task can tell).
EMPLOYEE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Longest pause per chunk of an export (its ``chunk_pause`` argument), in seconds.
MAX_CHUNK_PAUSE = 1.0

#: Kinds of notification.
NOTIFICATION_TYPES = ("email", "sms", "push", "in_app")
#: Longest notification message, in characters.
MAX_MESSAGE = 2000
#: What a user id looks like.
USER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,100}")

#: Suffixes of export files (what the web service lists and serves, what the clean-up deletes).
EXPORT_SUFFIXES = (".csv", ".xlsx")
#: Suffix of files being written; never listed, served or cleaned up.
TEMP_SUFFIX = ".tmp"
