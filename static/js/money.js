// Money on the page, by the rules of billing/money.py (the one place they are stated):
// totals in cents with the currency code ("1,234.50 USD"), a non-zero total under a cent with
// the decimals it needs ("0.0031 USD"), one message's cost with up to six decimals
// ("0.000125 USD"), and an unknown price as "price unknown", never as zero. Amounts arrive
// from the API as six-decimal strings; the arithmetic is done on integers of millionths
// (BigInt), never on floats, and rounds half up as the server does.

const UNKNOWN = "price unknown";
const MINUS = "\u2212";
const DECIMAL = /^(-?)(\d+)(?:\.(\d+))?$/;

function toMicro(value) {
  const match = DECIMAL.exec(String(value).trim());
  if (!match) return null;
  const [, sign, whole, fraction = ""] = match;
  const digits = `${fraction}0000000`.slice(0, 7); // one digit past millionths, to round on
  let micro = BigInt(whole) * 1000000n + BigInt(digits.slice(0, 6));
  if (Number(digits[6]) >= 5) micro += 1n;
  return sign ? -micro : micro;
}

function neededPlaces(micro, least, most) {
  const fraction = (micro < 0n ? -micro : micro) % 1000000n;
  const trimmed = fraction.toString().padStart(6, "0").replace(/0+$/, "");
  return Math.min(Math.max(trimmed.length, least), most);
}

function render(micro, places, currency) {
  const negative = micro < 0n;
  const magnitude = negative ? -micro : micro;
  const step = 10n ** BigInt(6 - places);
  const rounded = (magnitude + step / 2n) / step; // half up, on the magnitude
  const scale = 10n ** BigInt(places);
  const whole = (rounded / scale).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const fraction = places ? `.${(rounded % scale).toString().padStart(places, "0")}` : "";
  return `${negative && rounded !== 0n ? MINUS : ""}${whole}${fraction} ${currency || "USD"}`;
}

export function formatMoney(value, currency = "USD") {
  if (value === null || value === undefined || value === "") return UNKNOWN;
  const micro = toMicro(value);
  if (micro === null) return "—";
  const small = micro !== 0n && (micro < 0n ? -micro : micro) < 10000n;
  return render(micro, small ? neededPlaces(micro, 2, 6) : 2, currency);
}

export function formatCost(value, currency = "USD") {
  if (value === null || value === undefined || value === "") return UNKNOWN;
  const micro = toMicro(value);
  if (micro === null) return "—";
  return render(micro, neededPlaces(micro, 2, 6), currency);
}
