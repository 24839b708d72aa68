"""The one place money is quantized and formatted.

Rules, stated once (docs/BILLING.md quotes them):

- Money is `Decimal`, never float. Rounding is ROUND_HALF_UP (0.005 → 0.01) wherever it
  happens, and it happens only here.
- The ledger keeps six decimals (`quantize_micro`): a provider call's cost in USD, a session's
  running total, an exchange rate. The REST API hands such amounts out as six-decimal strings
  (`api_amount`), as DESIGN.md fixes.
- Money leaves the system in cents (`quantize_cents`): report lines, invoice lines, CSV.
- Shown to a person, an amount always carries its currency code: totals and invoice lines in
  cents (`format_money`, "1,234.50 EUR"), and a non-zero amount that cents would show as 0.00
  keeps the decimals it needs ("0.0031 USD"), so nothing that cost money ever reads as free.
  A single message's LLM cost keeps up to six decimals (`format_cost`, "0.000125 USD"); the
  admin's ledger columns show the stored six (`format_ledger`).
- An unknown amount (a call with no price) is never shown as zero: it reads "price unknown".
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import overload

CENT = Decimal("0.01")
MICRO = Decimal("0.000001")
ZERO = Decimal("0")
UNKNOWN = "price unknown"
MINUS = "\u2212"  # a real minus sign: a hyphen before a figure reads as a dash
DEFAULT_CURRENCY = "USD"


def to_decimal(value) -> Decimal | None:
    """A Decimal from a Decimal, int or numeric string; None for None, "" or garbage (never float maths)."""
    if value is None or value == "":
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        # Only ever reached from a database driver that hands back floats (SQLite aggregates):
        # its repr is the shortest decimal that round-trips, which is the stored value.
        value = repr(value)
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def quantize(value: Decimal, places: int) -> Decimal:
    """`value` to `places` decimals, half up."""
    return Decimal(value).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def quantize_cents(value: Decimal) -> Decimal:
    """Where money leaves the system: two decimals, half up."""
    return quantize(value, 2)


def quantize_micro(value: Decimal | None) -> Decimal | None:
    """The ledger's precision: six decimals, half up (None stays None: an unknown cost)."""
    if value is None:
        return None
    return quantize(value, 6)


def amount_text(value: Decimal, places: int = 2) -> str:
    """Fixed decimals, no grouping, never scientific notation: "1234.50" (CSV, forms)."""
    return f"{quantize(value, places):.{places}f}"


@overload
def api_amount(value: Decimal) -> str: ...
@overload
def api_amount(value: Decimal | None) -> str | None: ...
def api_amount(value: Decimal | None) -> str | None:
    """Money in the REST API: a string with six decimals (None for an unknown cost)."""
    amount = to_decimal(value)
    if amount is None:
        return None
    return amount_text(amount, 6)


def _needed_places(value: Decimal, least: int, most: int) -> int:
    """The fewest decimals (at least `least`, at most `most`) that show `value` without loss."""
    exact = quantize(value, most).normalize()
    places = max(-exact.as_tuple().exponent, 0) if exact != 0 else 0
    return min(max(places, least), most)


def _grouped(value: Decimal, places: int) -> str:
    text = f"{abs(value):,.{places}f}"
    return f"{MINUS}{text}" if value < 0 else text


def format_money(value, currency: str = DEFAULT_CURRENCY, *, sign: int = 1) -> str:
    """A total or an invoice figure: "1,234.50 EUR"; a non-zero amount under a cent keeps its digits.

    `sign=-1` shows the amount negated (a credit note's lines are stored positive).
    """
    amount = to_decimal(value)
    if amount is None:
        return UNKNOWN
    amount = amount * sign
    if amount != 0 and abs(amount) < CENT:
        places = _needed_places(amount, 2, 6)
    else:
        places = 2
    return f"{_grouped(quantize(amount, places), places)} {currency or DEFAULT_CURRENCY}"


def format_cost(value, currency: str = DEFAULT_CURRENCY) -> str:
    """One message's or call's LLM cost: as many decimals as it needs, up to six ("0.000125 USD")."""
    amount = to_decimal(value)
    if amount is None:
        return UNKNOWN
    places = _needed_places(amount, 2, 6)
    return f"{_grouped(quantize(amount, places), places)} {currency or DEFAULT_CURRENCY}"


def format_ledger(value, currency: str = DEFAULT_CURRENCY) -> str:
    """An amount at the ledger's full precision, for the admin's record views ("0.000150 USD")."""
    amount = to_decimal(value)
    if amount is None:
        return UNKNOWN
    return f"{_grouped(quantize(amount, 6), 6)} {currency or DEFAULT_CURRENCY}"


def format_rate(value) -> str:
    """An exchange rate as stored, trailing zeros dropped but at least two decimals ("0.9231")."""
    rate = to_decimal(value)
    if rate is None:
        return "—"
    return amount_text(rate, _needed_places(rate, 2, 6))


def format_plain(value, places: int = 2) -> str:
    """A figure for a table cell whose column header names the currency: "1,234.50"."""
    amount = to_decimal(value)
    if amount is None:
        return "—"
    return _grouped(quantize(amount, places), places)
