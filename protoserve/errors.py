"""The one base class for errors a user can act on.

Every part raises a subclass where it finds the problem; the CLI turns any of them into one
line on stderr and a non-zero exit, the service into a 4xx. Anything else is a bug.
"""


class ProtoserveError(Exception):
    """A problem with the user's input, files or configuration, with a message they can act on."""
