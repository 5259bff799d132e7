"""What a user got wrong, told apart from bugs.

:class:`UserError` marks an exception whose message is the whole story: a missing or unreadable
corpus, model directory, tokenizer or config file, a config value out of range, storage that
cannot be reached, a Ray address that does not answer. The ``wmss`` command and the ``jobs/``
entrypoints print its message in one or two lines and exit with status 2; the traceback only
with ``--verbose``. Anything else is a bug: its traceback is shown.

The concrete errors (``ConfigError``, ``CorpusError``, ``StorageError``, ``AuthTokenError``,
``RayUnreachableError``, ``ModelDirError``) subclass it where they are defined; it lives here,
in the lowest room every other may import, so no layer has to import another's errors.

Layer: imports nothing of ours.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix from its message alone (see the module doc)."""


def find_user_error(err: BaseException | None, _depth: int = 0) -> UserError | None:
    """The :class:`UserError` that caused ``err``, or None when none did.

    Follows ``__cause__``, ``__context__`` and a ``cause`` attribute (``ray.exceptions.RayTaskError``
    and Ray Train's worker errors carry the user's exception there), so an error raised in a Ray
    task or a phase's actor is still recognised in the driver.
    """
    if err is None or _depth > 20:
        return None
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        # Ray's task errors derive from the cause's class too (``as_instanceof_cause``), with a
        # message that is the remote traceback: the cause itself holds the user's message.
        found = find_user_error(cause, _depth + 1)
        if found is not None:
            return found
    if isinstance(err, UserError):
        return err
    for nxt in (err.__cause__, err.__context__):
        if isinstance(nxt, BaseException):
            found = find_user_error(nxt, _depth + 1)
            if found is not None:
                return found
    return _from_remote_traceback(err) if _depth == 0 else None


def _user_error_names() -> set[str]:
    """The names of :class:`UserError` and its subclasses, without the classes Ray makes on the fly
    (``RayTaskError(CorpusError)``, ``as_instanceof_cause``): they exist only in a process that has
    already received such an error, so the answer would depend on what the process did before."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        if "(" not in cls.__name__:
            names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _from_remote_traceback(err: BaseException) -> UserError | None:
    """A user error raised in a Ray Data task reaches the driver as text only: Ray Data wraps it
    in ``UserCodeException`` and the original exception (its ``__cause__``) does not survive
    pickling, but the remote traceback in the message ends with ``<module>.CorpusError: <msg>``.
    The last such line of a :class:`UserError` subclass becomes a ``UserError`` with that message."""
    names = _user_error_names()
    found = None
    for line in str(err).splitlines():
        head, sep, msg = line.strip().partition(": ")
        if sep and head.rsplit(".", 1)[-1] in names and msg.strip():
            found = msg.strip()
    return UserError(found) if found else None


def user_error_text(err: UserError) -> str:
    """The message to print: the error's own text (first lines), without Ray's wrapping."""
    text = str(err).strip() or type(err).__name__
    lines = text.splitlines()
    return "\n".join(lines[:3])
