"""Secrets never reach workflow history through an activity's exception.

An exception that escapes an activity is written to history with its message and its
whole cause chain. libpq, redis-py and boto may quote what they were given (a connection
string, an AUTH argument), so a message that contains a secret this worker resolved is
replaced, chain and all, by one ApplicationError with the secrets blanked. Its type and
retryability are kept: retry policies match on the type.
"""

from __future__ import annotations

from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from eagle_dr.config import scrub


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def scrubbed(e: BaseException) -> BaseException:
    """``e`` itself when nothing in its chain holds a secret, else a clean copy."""
    chain = _chain(e)
    texts = [str(x) for x in chain] + [repr(getattr(x, "details", "")) for x in chain]
    if all(scrub(t) == t for t in texts):
        return e
    message = " <- ".join(scrub(str(x)) or type(x).__name__ for x in chain)
    if isinstance(e, ApplicationError):
        return ApplicationError(message, type=e.type, non_retryable=e.non_retryable,
                                next_retry_delay=e.next_retry_delay)
    return ApplicationError(message, type=type(e).__name__)


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except Exception as e:
            clean = scrubbed(e)
            if clean is e:
                raise
            raise clean from None


class ScrubSecrets(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)
