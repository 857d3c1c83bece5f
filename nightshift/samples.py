"""A generator of short, realistic business documents for the demo and the tests.

Three kinds, drawn deterministically from a seed: service contracts, product
reviews and invoices. Each document is a few sentences with concrete names,
amounts and dates, so a summary of it can be checked by reading.
"""

from __future__ import annotations

import random

_COMPANIES = [
    "Northwind Traders",
    "Bluepeak Logistics",
    "Harbor & Pine LLP",
    "Cedar Analytics",
    "Orbital Foods",
    "Kestrel Manufacturing",
    "Lumen Health",
    "Granite Software",
    "Silver Fern Hotels",
    "Redwood Energy",
    "Atlas Freight",
    "Meridian Bank",
]
_SERVICES = [
    "cloud hosting",
    "office cleaning",
    "payroll processing",
    "security monitoring",
    "software maintenance",
    "fleet servicing",
    "catering",
    "legal advisory",
]
_PRODUCTS = [
    ("wireless headphones", "battery life", "the left earcup cracked"),
    ("espresso machine", "the crema", "the steam wand leaks"),
    ("running shoes", "the cushioning", "the sole wore out quickly"),
    ("robot vacuum", "the suction", "it gets stuck under the sofa"),
    ("standing desk", "the motor", "the desktop wobbles at full height"),
    ("e-reader", "the screen", "page turns lag"),
    ("air purifier", "how quiet it is", "the filter is expensive"),
    ("mechanical keyboard", "the switches", "the keycaps show shine"),
]
_ITEMS = [
    ("consulting hours", 150),
    ("laptop", 1200),
    ("monitor", 320),
    ("license seat", 45),
    ("server rack", 2400),
    ("training session", 800),
    ("support plan", 600),
]
_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} 2026"


def _contract(rng: random.Random) -> str:
    client, vendor = rng.sample(_COMPANIES, 2)
    service = rng.choice(_SERVICES)
    fee = rng.randrange(2, 60) * 500
    months = rng.choice([6, 12, 24, 36])
    notice = rng.choice([30, 60, 90])
    return (
        f"This agreement, effective {_date(rng)}, is between {client} (the Client) and "
        f"{vendor} (the Provider). The Provider will deliver {service} for a term of "
        f"{months} months at a monthly fee of ${fee:,}. Invoices are payable within 30 days. "
        f"Either party may terminate with {notice} days' written notice. The Provider's "
        f"liability is capped at the fees paid in the preceding twelve months."
    )


def _review(rng: random.Random) -> str:
    product, praise, complaint = rng.choice(_PRODUCTS)
    stars = rng.randint(1, 5)
    name = rng.choice(_NAMES)
    weeks = rng.randint(1, 20)
    mood = {1: "Very disappointed.", 2: "Not great.", 3: "It is fine.", 4: "Happy overall.", 5: "Excellent purchase."}[
        stars
    ]
    return (
        f"{stars}/5 stars, by {name}. {mood} I have used this {product} for {weeks} weeks. "
        f"I really like {praise}, but {complaint}. "
        + ("I would buy it again." if stars >= 4 else "I am considering a return.")
    )


def _invoice(rng: random.Random) -> str:
    seller, buyer = rng.sample(_COMPANIES, 2)
    lines = rng.sample(_ITEMS, rng.randint(1, 3))
    parts, total = [], 0
    for item, price in lines:
        qty = rng.randint(1, 12)
        total += qty * price
        parts.append(f"{qty} x {item} at ${price:,}")
    number = rng.randint(1000, 9999)
    return (
        f"Invoice #{number} from {seller} to {buyer}, issued {_date(rng)}. "
        f"Items: {'; '.join(parts)}. Total due: ${total:,}, payable within 30 days "
        f"by bank transfer. Late payments accrue 1.5% interest per month."
    )


_KINDS = {"contract": _contract, "review": _review, "invoice": _invoice}


def sample_documents(count: int = 200, seed: int = 0) -> list[dict]:
    """`count` documents as dicts with `id`, `kind` and `text`, the same for the same seed."""
    rng = random.Random(seed)
    kinds = list(_KINDS)
    docs = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        docs.append({"id": f"doc-{i:05d}", "kind": kind, "text": _KINDS[kind](rng)})
    return docs
