"""The base class of every task: acks late, retries through the broker.

Celery's retry options keep their meaning (``service.retry_policy`` holds the
rules); the waiting happens in broker wait queues instead of ETA messages held
by a worker. A task that declares none of them gets the kit's policy.

Celery's options, as a task declares them (``@app.task(...)`` options or
attributes of its class; values inherited from Celery's ``Task`` do not count):

- ``autoretry_for`` / ``dont_autoretry_for``: what a plain raise retries;
  anything else is dead-lettered at once (``permanent-error``).
- ``max_retries``: the retry limit; None (Celery: unlimited) means KIT_MAX_RETRIES.
  ``retry_kwargs={"max_retries": n, "countdown": s}`` comes first.
- ``default_retry_delay``: seconds before a retry that names no countdown.
- ``retry_backoff`` / ``retry_backoff_max`` / ``retry_jitter``: Celery's
  exponential backoff for ``autoretry_for``.
- ``throws``: like ``permanent_exceptions``.
- ``self.retry(exc=..., countdown=..., eta=..., max_retries=...)``: retried
  after that delay, up to that limit; past it ``self.retry`` raises ``exc``
  (or MaxRetriesExceededError) as in Celery, and the task is dead-lettered as
  ``retries-exhausted``.

The kit's own:

- ``permanent_exceptions``: exception classes that are never retried
  (``service.errors.PermanentError`` never is either).
- ``retry_delay_base`` / ``retry_delay_max``: seconds of the kit's backoff;
  None means the KIT_RETRY_BACKOFF_* settings.
- ``retry_on_raise``: None (default) decides from the code: a task whose
  function calls ``self.retry`` and that declares ``max_retries`` or
  ``default_retry_delay`` retries by hand (Celery's manual retry), so any other
  exception fails it at once; else a plain raise is retried (the kit's policy).
  True or False says so explicitly.
- ``max_worker_lost``: deliveries that may kill the worker process before the
  message counts as poison; None means KIT_MAX_WORKER_LOST.

``acks_late=False`` is refused when the task is defined: an early-acked task
that fails would be lost. ``self.retry()`` publishes nothing from the task:
the worker's main process moves the message to a wait queue.

Why this module is over 400 lines (about 425): ``ReliableTask`` and the
helpers that read what a task declares (``declared``, ``calls_self_retry``,
``definition_problems``) and how its failure ends (``final_decision``) are one
reading of Celery's retry options, checked together when a task is defined and
when it fails; the rules themselves are apart, in ``service.retry_policy``.
"""

from __future__ import annotations

import dis
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import CodeType
from typing import Any, ClassVar, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded

from service import headers as h
from service.errors import KitError
from service.retry_policy import CELERY_RETRY_BACKOFF_MAX, Decision, Policy, decide
from service.settings import load
from service.worker import pools

logger = logging.getLogger(__name__)

#: Attribute a final decision made in the pool process travels on, with the exception, to the main process.
DECISION_ATTRIBUTE = "_kit_decision"

#: Options whose presence on a task that calls ``self.retry`` makes it a manual-retry task.
_MANUAL_RETRY_OPTIONS = ("max_retries", "default_retry_delay")
#: Options that must be exception classes (or tuples of them).
_EXCEPTION_OPTIONS = ("autoretry_for", "dont_autoretry_for", "permanent_exceptions", "throws")

_pending_retry = threading.local()


class TaskDefinitionError(KitError, TypeError):
    """A task is declared in a way the kit cannot run safely (``acks_late=False``, a malformed retry option)."""


class KitRetry(Retry):
    """Celery's Retry with the kit's decision: the delay is final and ``rule`` names the rule that chose it.

    Celery logs ``str()`` of it in the pool ("Task x[id] retry: Retry in 2s by
    rule autoretry-for: ConnectionError(...)"); the main process schedules it as is.
    """

    def __init__(self, message: str | None = None, exc: Any = None, when: Any = None, rule: str = "",
                 **kwargs: Any) -> None:
        super().__init__(message, exc, when, **kwargs)
        self.rule = rule

    def humanize(self) -> str:
        """``in 1.5s`` (no trailing ``.0``)."""
        if isinstance(self.when, (int, float)) and not isinstance(self.when, bool):
            return f"in {self.when:g}s"
        return super().humanize()

    def __str__(self) -> str:
        text = f"Retry {self.humanize()} by rule {self.rule}"
        return f"{text}: {self.excs}" if self.excs else text

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.message, self.exc, self.when, self.rule)


def arguments_do_not_fit(task: Task, exc: BaseException, args: Any, kwargs: Any) -> bool:
    """True when ``exc`` is the TypeError of calling ``task`` with arguments its signature refuses."""
    if not isinstance(exc, TypeError):
        return False
    try:
        inspect.signature(task.run).bind(*(args or ()), **(kwargs or {}))
    except TypeError:
        return True
    except (ValueError, AttributeError):
        return False
    return False


# -- what a task declares ---------------------------------------------------------------


_UNSET = object()


def declared(task_cls: type, name: str) -> Any:
    """The value ``task_cls`` itself sets for ``name`` (@app.task options land on its class), or ``_UNSET``.

    Only classes below ReliableTask count: Celery's class defaults
    (``max_retries=3``, ``default_retry_delay=180``) are not declarations.
    """
    for klass in task_cls.__mro__:
        if klass is ReliableTask or klass is Task:
            break
        if name in vars(klass):
            return vars(klass)[name]
    return _UNSET


def is_declared(task_cls: type, name: str) -> bool:
    """Whether ``task_cls`` (or a base class of the user's, below ReliableTask) sets ``name``."""
    return declared(task_cls, name) is not _UNSET


def _code_calls_retry(code: CodeType) -> bool:
    """Whether ``code`` or a function/lambda/comprehension defined in it reads an attribute ``retry``."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and instruction.argval == "retry":
            return True
    return any(isinstance(const, CodeType) and _code_calls_retry(const) for const in code.co_consts)


@functools.cache
def calls_self_retry(task_cls: type) -> bool:
    """Whether the task's function calls ``self.retry`` (static: its code, and code nested in it, read ``.retry``).

    Helpers it calls are not looked into; such a task says ``retry_on_raise=False``.
    """
    run = inspect.unwrap(getattr(task_cls, "run", None) or (lambda: None))
    code = getattr(run, "__code__", None)
    return isinstance(code, CodeType) and _code_calls_retry(code)


def _exception_classes(value: Any) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    return tuple(value or ())


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _whole(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else max(0, int(number))


def _backoff_factor(value: Any) -> float:
    """Celery's ``retry_backoff``: True means a factor of 1, False (or nothing usable) off."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return max(0.0, _number(value) or 0.0)


def _run_by_celery_command() -> bool:
    """Whether this process is the ``celery`` command (a worker or beat), where an error should be one line."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name == "celery.__main__") or Path(sys.argv[0]).name == "celery"


def _refuse(error: TaskDefinitionError) -> NoReturn:
    """A worker or beat ends with ``error: ...`` (exit status 2); anywhere else the error is raised."""
    if _run_by_celery_command():
        from service import startup

        startup.exit_with(error)
    raise error


def definition_problems(task_cls: type) -> list[str]:
    """What is wrong with a task's declaration for the kit (empty when nothing is)."""
    problems = []
    if not getattr(task_cls, "acks_late", True):
        problems.append("sets acks_late=False: the kit acks every task late, after it ran, so a failure is "
                        "retried or dead-lettered instead of lost; remove acks_late=False")
    for name in _EXCEPTION_OPTIONS:
        value = getattr(task_cls, name, ())
        classes = (value,) if isinstance(value, type) else value
        if not isinstance(classes, (tuple, list, set, frozenset)) or not all(
                isinstance(c, type) and issubclass(c, BaseException) for c in classes):
            problems.append(f"{name}={value!r} is not an exception class or a tuple of them")
    retry_kwargs = declared(task_cls, "retry_kwargs")
    if retry_kwargs is not _UNSET and not isinstance(retry_kwargs, Mapping):
        problems.append(f"retry_kwargs={retry_kwargs!r} is not a dict")
    for name in ("max_retries", "default_retry_delay", "retry_backoff_max"):
        value = declared(task_cls, name)
        if value is not _UNSET and value is not None and (_number(value) is None or value < 0):
            problems.append(f"{name}={value!r} is not a number >= 0")
    return problems


# -- the base class -----------------------------------------------------------------------


class ReliableTask(Task):
    """Celery Task with the kit's delivery guarantees (see the module docstring)."""

    Request = "service.worker.request:ReliableRequest"
    acks_late = True
    reject_on_worker_lost = True
    max_retries: int | None = None
    permanent_exceptions: ClassVar[tuple[type[BaseException], ...]] = ()
    retry_delay_base: float | None = None
    retry_delay_max: float | None = None
    max_worker_lost: int | None = None
    retry_on_raise: bool | None = None
    #: Keeps Celery from wrapping ``run`` for ``autoretry_for`` (its wrapper skips
    #: tasks that have ``_orig_run``): the kit applies autoretry_for itself, in
    #: ``service.retry_policy``, so the decision and the recorded rule are one.
    _orig_run = None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Refuse, when the task is defined, a declaration the kit cannot keep its promises with."""
        super().on_bound(app)
        if cls.name is None:
            return  # the abstract base of the app
        problems = definition_problems(cls)
        if problems:
            _refuse(TaskDefinitionError(f"task {cls.name!r} ({cls.__module__}): " + "; ".join(problems)))

    # -- running --------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task; turn a retryable exception into a KitRetry with its delay.

        Deciding here, in the pool process, makes Celery log and count the run
        as retried rather than failed. The worker's main process then moves the
        message to a wait queue (see service.worker.request). A final decision
        travels with the exception (``DECISION_ATTRIBUTE``).
        """
        _pending_retry.value = None
        try:
            result = pools.run_within_time_limits(self, super().__call__, args, kwargs)
        except KitRetry:
            raise
        except Retry as retry:  # raised by hand rather than through self.retry()
            raise self._retry_or_final(retry.exc, _delay_of(retry.when), None) from None
        except (Ignore, Reject):
            raise
        except pools.HardTimeLimit:  # delivered just as the run ended
            raise self._judged(TimeLimitExceeded(self.time_limit), args, kwargs) from None
        except Exception as exc:
            outcome = self._judged(exc, args, kwargs)
            if outcome is exc:
                raise
            raise outcome from exc
        pending, _pending_retry.value = _pending_retry.value, None
        if pending is not None:  # self.retry(throw=False) and then returned: the retry still happens
            raise pending
        return result

    def _judged(self, exc: BaseException, args: Any, kwargs: Any) -> BaseException:
        """What to raise for ``exc``: a KitRetry, or ``exc`` itself carrying its final decision."""
        retries = h.count(self.request.retries)
        decision = final_decision(exc, self.request.id, retries)
        if decision is None:
            permanent = h.REASON_INVALID_ARGUMENTS if arguments_do_not_fit(self, exc, args, kwargs) else None
            decision = decide(self.retry_policy(), exc, retries=retries, permanent_reason=permanent)
        if decision.retry:
            return KitRetry(exc=exc, when=round(decision.delay_s, 3), rule=decision.rule)
        mark_final(exc, self.request.id, retries, decision)
        return exc

    def retry_policy(self) -> Policy:
        """This task's retry settings: what it declares, with the environment's defaults filled in."""
        settings = load()
        cls = type(self)
        retry_kwargs = declared(cls, "retry_kwargs")
        retry_kwargs = retry_kwargs if isinstance(retry_kwargs, Mapping) else {}
        max_retries = _whole(retry_kwargs.get("max_retries"))
        if max_retries is None:
            max_retries = _whole(self.max_retries)
        autoretry_for = declared(cls, "autoretry_for")
        default_delay = declared(cls, "default_retry_delay")
        retry_backoff = declared(cls, "retry_backoff")
        backoff_max = declared(cls, "retry_backoff_max")
        jitter = declared(cls, "retry_jitter")
        dont = declared(cls, "dont_autoretry_for")
        if self.retry_on_raise is not None:
            raise_fails = not self.retry_on_raise
        else:
            raise_fails = calls_self_retry(cls) and any(is_declared(cls, n) for n in _MANUAL_RETRY_OPTIONS)
        return Policy(
            max_retries=settings.max_retries if max_retries is None else max_retries,
            backoff_base_s=self.retry_delay_base or settings.retry_backoff_base,
            backoff_max_s=self.retry_delay_max or settings.retry_backoff_max,
            max_worker_lost=self.max_worker_lost or settings.max_worker_lost,
            permanent_exceptions=_exception_classes(self.permanent_exceptions) + _exception_classes(self.throws),
            autoretry_for=None if autoretry_for is _UNSET else _exception_classes(autoretry_for),
            dont_autoretry_for=() if dont is _UNSET else _exception_classes(dont),
            retry_countdown_s=_number(retry_kwargs.get("countdown")),
            default_retry_delay_s=None if default_delay is _UNSET else _number(default_delay),
            retry_backoff=0.0 if retry_backoff is _UNSET else _backoff_factor(retry_backoff),
            retry_backoff_max_s=(_number(backoff_max) if backoff_max is not _UNSET else None)
            or CELERY_RETRY_BACKOFF_MAX,
            retry_jitter=True if jitter is _UNSET else bool(jitter),
            raise_fails=raise_fails,
        )

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Ask for a retry; the worker schedules it in a broker wait queue.

        As in Celery: the delay is ``countdown``, else ``eta``, else a declared
        ``default_retry_delay`` (else the kit's backoff); the limit is
        ``max_retries``, else the task's. Past the limit this raises ``exc`` (or
        MaxRetriesExceededError), which dead-letters the task as
        ``retries-exhausted`` unless the task catches it. Unlike Celery, nothing
        is published from here and no ETA message is held by the worker;
        ``args``/``kwargs``/``options`` changes are not supported: the same message runs again.
        """
        request = self.request
        if request.called_directly:  # not run by a worker: as Celery, raise the original exception
            raise exc or Retry("Task can be retried", None)
        if args is not None or kwargs is not None or options:
            logger.warning("%s[%s]: self.retry() ignores args, kwargs and options: the same message runs again",
                           self.name, request.id)
        delay = _number(countdown) if countdown is not None else _delay_of(eta)
        reason = self._retry_or_final(exc if exc is not None else sys.exc_info()[1], delay, max_retries,
                                      explicit_exc=exc)
        if not throw:
            _pending_retry.value = reason
            return reason
        raise reason

    def _retry_or_final(self, cause: BaseException | None, delay: Any, max_retries: Any, *,
                        explicit_exc: BaseException | None = None) -> KitRetry:
        """The KitRetry for a requested retry, or raise what Celery raises past the limit (with its decision)."""
        retries = h.count(self.request.retries)
        decision = decide(
            self.retry_policy(), cause if isinstance(cause, BaseException) else Retry,
            retries=retries, retry_requested=True, requested_delay_s=_number(delay),
            requested_max_retries=_whole(max_retries),
        )
        if decision.retry:
            return KitRetry(exc=cause, when=round(decision.delay_s, 3), rule=decision.rule)
        final = explicit_exc if explicit_exc is not None else cause
        if not isinstance(final, Exception) or isinstance(final, Retry):
            final = self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{self.request.id}] args:{self.request.args} kwargs:{self.request.kwargs}")
        mark_final(final, self.request.id, retries, decision)
        raise final


def _delay_of(eta: Any) -> float | None:
    """Seconds from now to ``eta``: a number of seconds, a datetime (naive meaning UTC) or ISO 8601; else None."""
    if _number(eta) is not None:
        return _number(eta)
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            return None
    if not isinstance(eta, datetime):
        return None
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=UTC)
    return max(0.0, (eta - datetime.now(UTC)).total_seconds())


# -- a final decision, from the pool process to the main process ---------------------------


def mark_final(exc: BaseException, task_id: Any, retries: int, decision: Decision) -> None:
    """Attach the pool's final ``decision`` to ``exc``; it survives pickling with the exception's ``__dict__``."""
    try:
        setattr(exc, DECISION_ATTRIBUTE, (str(task_id), retries, decision.reason, decision.rule))
    except (AttributeError, TypeError):
        pass  # no __dict__: the main process decides again from the exception's class


def final_decision(exc: BaseException, task_id: Any, retries: int) -> Decision | None:
    """The final decision ``mark_final`` attached to ``exc`` for this run (task id and retries), else None."""
    try:
        mark = vars(exc).get(DECISION_ATTRIBUTE)
    except TypeError:
        return None
    if (isinstance(mark, tuple) and len(mark) == 4 and mark[0] == str(task_id) and mark[1] == retries
            and all(isinstance(v, str) for v in mark[2:])):
        return Decision(False, mark[2], rule=mark[3])
    return None
