"""Example tasks of the kinds ops teams run: e-mail, report export, webhooks, clean-up.

One module per kind of work; each registers its tasks on ``service.app.app``.
A new task module goes here (or in a module named by KIT_TASK_MODULES).

May import: ``service.app``, ``service.errors`` (PermanentError) and
``service.settings``.
"""
