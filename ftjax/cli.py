"""Shared CLI behaviour: user mistakes end as one `ftjax: error: ...` line, exit status 2."""

from __future__ import annotations

import contextlib
import sys

from ftjax.errors import UserError, one_line


@contextlib.contextmanager
def user_errors():
    """Turns UserError (and config-flag mistakes) into one stderr line and exit code 2."""
    try:
        yield
    except UserError as e:
        print(f"ftjax: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        raise
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown keys / wrong types of --config.x
        # overrides and for a config file's own mistakes, before any work starts.
        if _from_config_flags(e):
            print(f"ftjax: error: bad config: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        raise


def _from_config_flags(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "ml_collections" in name or "absl/flags" in name or "/configs/" in name:
            return True
        tb = tb.tb_next
    return False
