"""``wmss_ray.io.errors``: the user's mistakes told apart from bugs, through Ray's wrapping."""

from __future__ import annotations

from wmss_ray.io.errors import UserError, find_user_error, user_error_text


class _Wrapped(Exception):
    """Stands for ``ray.exceptions.RayTaskError``: the original exception rides in ``.cause``."""

    def __init__(self, cause):
        super().__init__("ray.exceptions.RayTaskError(CorpusError): ... traceback text ...")
        self.cause = cause


def test_the_concrete_errors_are_user_errors():
    from wmss_ray.cluster import AuthTokenError, RayUnreachableError
    from wmss_ray.config.schema import ConfigError
    from wmss_ray.data.rejects import CorpusError
    from wmss_ray.io.storage import StorageError
    from wmss_ray.models.loading import ModelDirError

    for cls in (ConfigError, CorpusError, StorageError, AuthTokenError, RayUnreachableError, ModelDirError):
        assert issubclass(cls, UserError), cls
    # the old bases stay, so existing `except ValueError / OSError / ConnectionError` still match
    assert issubclass(ConfigError, ValueError) and issubclass(StorageError, OSError)
    assert issubclass(RayUnreachableError, ConnectionError) and issubclass(ModelDirError, FileNotFoundError)


def test_found_through_cause_context_and_ray_wrapping():
    err = UserError("data.train: corpus /x does not exist")
    assert find_user_error(err) is err
    assert find_user_error(_Wrapped(err)) is err
    try:
        try:
            raise err
        except UserError as inner:
            raise RuntimeError("phase tokenize failed") from inner
    except RuntimeError as outer:
        assert find_user_error(outer) is err
    try:
        try:
            raise err
        except UserError:
            raise KeyError("while handling")  # noqa: B904 - an implicit __context__ chain
    except KeyError as outer:
        assert find_user_error(outer) is err


def test_a_ray_error_that_is_also_the_causes_class_gives_the_causes_message():
    """``RayTaskError.as_instanceof_cause()`` makes a class deriving from both: isinstance holds,
    but its message is the remote traceback; the cause's own message is the one to print."""
    cause = UserError("data.train row 3: messages is missing")

    class RayTaskErrorUserError(_Wrapped, UserError):
        pass

    found = find_user_error(RayTaskErrorUserError(cause))
    assert found is cause and user_error_text(found) == "data.train row 3: messages is missing"


def test_a_user_error_known_only_from_a_remote_traceback():
    """Ray Data's UserCodeException loses its __cause__ on the way to the driver; the remote
    traceback text still names the class and the message (as a Ray Data task failure reads)."""
    from wmss_ray.data.rejects import CorpusError  # noqa: F401 - registers the subclass name

    text = ("ray::ReadCorpus->MapBatches(TokenizeBatch)() (pid=1181, ip=192.0.2.2)\n"
            "  File \"tokenize.py\", line 90, in __call__\n"
            "wmss_ray.data.rejects.CorpusError: train.jsonl line 2: malformed_json: Expecting value\n")
    found = find_user_error(RuntimeError(text))
    assert user_error_text(found) == "train.jsonl line 2: malformed_json: Expecting value"
    assert find_user_error(RuntimeError("ValueError: shape mismatch")) is None


def test_a_bug_is_not_a_user_error():
    assert find_user_error(ValueError("shape mismatch")) is None
    assert find_user_error(_Wrapped(ZeroDivisionError())) is None
    assert find_user_error(None) is None


def test_the_answer_does_not_depend_on_ray_errors_the_process_saw_before():
    """Ray's ``as_instanceof_cause`` makes a class ``RayTaskError(CorpusError)`` deriving from the
    cause's class: once one exists in the process (a test of a bad corpus ran before), a bug's
    wrapper text naming it must still not read as a user error (CI saw it after test reordering)."""
    from wmss_ray.data.rejects import CorpusError

    dynamic = type("RayTaskError(CorpusError)", (_Wrapped, CorpusError), {})  # what Ray makes
    assert find_user_error(_Wrapped(ZeroDivisionError())) is None
    del dynamic


def test_text_is_at_most_three_lines():
    assert user_error_text(UserError("a\nb\nc\nd")) == "a\nb\nc"
    assert user_error_text(UserError("")) == "UserError"
