"""Exit codes, and the exception types the CLI turns into them (one line on stderr, no traceback).

    0    done (trained to train.max_steps, or the run was already finished)
    2    the user must act: bad config, command line, data or checkpoint (UserError); relaunching as is
         fails the same way, so launchers must not requeue
    75   requeue me (EX_TEMPFAIL): checkpointed on a scheduler signal (SIGTERM, the warning signal), or a
         transient failure such as a checkpoint that could not be written (a full disk); the run resumes
         from its last checkpoint, and checkpoint.max_restarts bounds resumes that make no progress
    130  interrupted by Ctrl-C (SIGINT): checkpointed at the next step boundary, not requeued
    other a crash (a bug, a dead peer rank): the traceback says where
"""

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input (config, data, checkpoint, command line). Printed without a traceback."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """A config file, key or value that is wrong (config.py names the key and the closest valid one)."""


class DataError(UserError):
    """A dataset that is missing, malformed or does not match the config."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible with the config."""


class TransientError(Exception):
    """A failure that a later attempt may not meet (the environment, not the input): exit 75, requeue me."""

    exit_code = EXIT_REQUEUE


class CheckpointWriteError(TransientError):
    """A checkpoint could not be written or committed (ENOSPC, EFBIG, EIO...); the previous one is kept."""


class StartupSignal(BaseException):
    """SIGTERM or SIGINT while a command is still starting (checkpoint/signals.install_early): raised from the
    handler so that a start blocked anywhere (a slow filesystem, a rendezvous) ends at once. A BaseException,
    like KeyboardInterrupt: no ``except Exception`` on the way may swallow it."""

    def __init__(self, signame: str, exit_code: int):
        super().__init__(f"received {signame} while starting (before the first training step); exiting with "
                         f"{exit_code} ({'requeue' if exit_code == EXIT_REQUEUE else 'interrupted'})")
        self.exit_code = exit_code


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error reports."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


class Preempted(Exception):
    """Raised after the checkpoint a signal asked for is written; the CLI exits with ``exit_code`` (75 requeue
    me; 130 after Ctrl-C). Not an error: the run resumes from that checkpoint."""

    def __init__(self, exit_code: int = EXIT_REQUEUE):
        super().__init__(exit_code)
        self.exit_code = exit_code
