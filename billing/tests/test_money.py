"""billing.money: one rounding rule, one look for money, the same in Python and on the page."""

from __future__ import annotations

import json
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from billing.money import (
    UNKNOWN,
    amount_text,
    api_amount,
    format_cost,
    format_ledger,
    format_money,
    quantize_cents,
    quantize_micro,
)

MONEY_JS = Path(__file__).resolve().parents[2] / "static" / "js" / "money.js"
SAMPLES = [
    "0.000000",
    "0.003100",
    "1234.500000",
    "0.005000",
    "0.000125",
    "1.234567",
    "0.012500",
    "999.995000",
    "-2.675000",
    "1000000.000000",
]


def test_rounding_is_half_up_to_the_cent_and_to_the_millionth():
    assert quantize_cents(Decimal("0.005")) == Decimal("0.01")
    assert quantize_cents(Decimal("2.675")) == Decimal("2.68")  # float would give 2.67
    assert quantize_cents(Decimal("0.004999")) == Decimal("0.00")
    assert quantize_micro(Decimal("0.0000005")) == Decimal("0.000001")
    assert quantize_micro(None) is None


def test_totals_show_cents_and_their_currency_and_tiny_amounts_keep_their_digits():
    assert format_money(Decimal("1234.5"), "EUR") == "1,234.50 EUR"
    assert format_money(Decimal("0"), "USD") == "0.00 USD"
    # A non-zero cost never reads as free.
    assert format_money(Decimal("0.0031"), "USD") == "0.0031 USD"
    assert format_money(Decimal("0.012500"), "USD") == "0.01 USD"
    assert format_money(Decimal("120"), "EUR", sign=-1) == "\u2212120.00 EUR"
    assert format_money(None) == UNKNOWN


def test_a_single_cost_keeps_the_decimals_it_needs():
    assert format_cost(Decimal("0.000125")) == "0.000125 USD"
    assert format_cost(Decimal("0.500000")) == "0.50 USD"
    assert format_cost(None) == UNKNOWN
    assert format_ledger(Decimal("0.00015")) == "0.000150 USD"


def test_the_api_and_csv_forms_are_fixed_decimals_without_grouping():
    assert api_amount(Decimal("1234.5")) == "1234.500000"
    assert api_amount(None) is None
    assert amount_text(Decimal("1E+3")) == "1000.00"  # never scientific notation
    assert amount_text(Decimal("0.11665"), 4) == "0.1167"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_chat_page_formats_money_exactly_as_the_server(tmp_path):
    script = tmp_path / "check.mjs"
    script.write_text(
        f"import {{ formatMoney, formatCost }} from {json.dumps(MONEY_JS.as_uri())};\n"
        f"const out = {json.dumps(SAMPLES)}.map((v) => [formatMoney(v, 'EUR'), formatCost(v)]);\n"
        "console.log(JSON.stringify(out));\n"
    )
    found = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)
    expected = [[format_money(Decimal(v), "EUR"), format_cost(Decimal(v))] for v in SAMPLES]
    assert found == expected
