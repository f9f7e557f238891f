"""Worker-side pieces: the task base class, the request and consumer overrides
that route failures to wait queues and dead-letter queues."""
