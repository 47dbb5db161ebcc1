"""The one base class of the errors a user can fix (bad config, input file, checkpoint, data).

Entry scripts catch ``ToraError`` only and print its message; anything else (an out-of-memory error, an
internal shape error) keeps its traceback.  Each error keeps its natural builtin base as well, so code
that catches ``ValueError`` or ``FileNotFoundError`` goes on working.
"""


class ToraError(Exception):
    """A problem in what the user gave (config, files, weights); the message names the key, file or line."""
