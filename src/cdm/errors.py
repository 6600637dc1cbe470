"""Errors: one class per kind of failure, each mapped here, once, to the `cdm` command's exit
code and to the HTTP status `cdm serve` answers with. Every message names its culprit
(file, item hash, compartment, field), and an operation that raises one changed nothing.
"""

from __future__ import annotations


class CdmError(Exception):
    """cdm cannot do what was asked."""

    exit_code = 2
    http_status = 422


class StoreError(CdmError, RuntimeError):
    """The store cannot do what was asked; the message names the culprit."""


class DataError(CdmError, ValueError):
    """Bad input data or arguments; the message names every offending file or field."""


class NotFound(StoreError):
    """No such store, item, source, compartment or user."""

    http_status = 404


class NotReady(StoreError):
    """A model that is needed is missing, out of date or corrupted: (re)train, or retry later."""

    http_status = 503


class Busy(StoreError):
    """Another writer holds the store's lock: retry when its work ends."""

    http_status = 503


class Forbidden(CdmError):
    """The access policy does not let this user (or key) do it."""

    http_status = 403
