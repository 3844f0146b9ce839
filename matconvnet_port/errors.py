"""Errors raised for bad input.

Every error a user can trigger with a bad file, layer or argument is one of
these, with a one-line message that names the file, variable, layer or field
at fault. Both subclass ``ValueError`` so ``except ValueError`` catches them.
"""


class MatFormatError(ValueError):
    """A MAT-file (or the network inside it) cannot be read or is malformed.

    The message names the file and the variable / layer / field at fault, e.g.
    ``net.mat: net.layers{3}.weights{1}: expected 4-D single array, got 2-D uint8``.
    """


def labelled(error: Exception, label: str) -> Exception:
    """``error`` with ``label: `` before its message (same type), to say which layer raised it;
    ``error`` itself if it already starts so, or if its type cannot be made from a message."""
    if str(error).startswith(label):
        return error
    try:
        return type(error)(f"{label}: {error}")
    except Exception:  # torch's own error types may take other arguments
        return error
