"""User-facing errors: each prints as one clear line, with no traceback, from the CLIs."""


class UserError(Exception):
    """Bad input from the user (config, data file, row, label, weights, checkpoint).

    Entry points catch it, print `ftjax: error: <message>` as one line and exit 2.
    The message says what was wrong and how to fix it.
    """


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
