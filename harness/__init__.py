"""A sandbox on the local RabbitMQ for the tests and the benchmarks: throwaway vhosts, bound processes, waiting.

What lives here: ``broker`` (the test broker's address and admin, its
management API, ``Vhost``: a fresh vhost deleted afterwards), ``processes``
(``spawn``: a process that dies with the run) and ``waiting`` (``wait_until``).
``tests/helpers`` builds the tests' fixtures on it; ``bench/`` uses it
directly, so neither imports the other.

May import the standard library and py-amqp only: nothing of ``service``,
``tests`` or ``bench``.
"""
