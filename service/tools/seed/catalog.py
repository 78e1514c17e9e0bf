"""The demo data's vocabulary and proportions: time zones, the service catalogue, names,
demand by weekday, month and hour, and the rates that shape clients, bookings and audits."""

from __future__ import annotations

DAY = 86_400
FUTURE_DAYS = 7  # the period ends this many days after today
TABLES = ("salons", "users", "professionals", "services", "bookings", "audit_events")

# (IANA zone, city used in salon names); the first salons take them in this order.
TIMEZONES: tuple[tuple[str, str], ...] = (
    ("Europe/Lisbon", "Lisbon"),
    ("America/New_York", "New York"),
    ("Asia/Tokyo", "Tokyo"),
    ("UTC", "Accra"),
    ("Australia/Sydney", "Sydney"),
    ("Europe/Berlin", "Berlin"),
    ("America/Los_Angeles", "Los Angeles"),
    ("America/Sao_Paulo", "São Paulo"),
)
DST_TIMEZONES = frozenset(
    {
        "Europe/Lisbon",
        "America/New_York",
        "Australia/Sydney",
        "Europe/Berlin",
        "America/Los_Angeles",
    }
)
TIMEZONE_WEIGHTS = (4.0, 4.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.5)

# category -> (service name, base price in cents, duration in minutes, popularity)
CATALOG: dict[str, tuple[tuple[str, int, int, float], ...]] = {
    "hair": (
        ("Women's cut", 4500, 60, 5.0),
        ("Men's cut", 2500, 30, 4.0),
        ("Blow-dry", 3000, 45, 3.0),
        ("Colour", 8500, 120, 2.0),
        ("Highlights", 12000, 150, 1.2),
        ("Kids' cut", 1800, 30, 1.0),
    ),
    "nails": (
        ("Manicure", 2500, 45, 3.0),
        ("Gel manicure", 3500, 60, 3.0),
        ("Pedicure", 3500, 60, 2.0),
        ("Nail art", 1500, 30, 0.8),
    ),
    "skin": (
        ("Classic facial", 6000, 60, 2.0),
        ("Hydrating facial", 7500, 75, 1.0),
        ("Chemical peel", 8000, 45, 0.8),
    ),
    "massage": (
        ("Swedish massage", 7000, 60, 2.0),
        ("Deep tissue massage", 9500, 90, 1.2),
        ("Hot stone massage", 9000, 75, 0.8),
    ),
    "brows": (
        ("Brow shaping", 1500, 20, 2.5),
        ("Brow tint", 1200, 20, 1.2),
        ("Brow lamination", 4000, 45, 0.8),
    ),
    "lashes": (("Lash lift", 5000, 60, 1.2), ("Lash extensions", 9000, 120, 0.8)),
    "barber": (("Beard trim", 1500, 20, 2.0), ("Hot towel shave", 2800, 30, 1.0)),
}
CATEGORIES = tuple(CATALOG)
CATEGORY_POPULARITY = {
    "hair": 1.0,
    "nails": 0.7,
    "skin": 0.35,
    "massage": 0.35,
    "brows": 0.5,
    "lashes": 0.3,
    "barber": 0.3,
}

SALON_WORDS = (
    "Velvet",
    "Golden",
    "Urban",
    "Blossom",
    "Silk",
    "Ivory",
    "Coral",
    "Luna",
    "Maple",
    "Olive",
    "Amber",
    "Indigo",
    "Willow",
    "Sage",
    "Pearl",
    "Juniper",
    "Saffron",
)
SALON_KINDS = ("Studio", "Salon", "Beauty Bar", "Spa", "Atelier", "Lounge", "House")
FIRST_NAMES = (
    "Ana",
    "Beatriz",
    "Carla",
    "Diana",
    "Eva",
    "Filipa",
    "Grace",
    "Hana",
    "Inês",
    "Julia",
    "Kenji",
    "Liam",
    "Marta",
    "Noah",
    "Olivia",
    "Pedro",
    "Rita",
    "Sofia",
    "Tomás",
    "Yuki",
    "Zoe",
    "Mateus",
    "Chloe",
    "Aiko",
    "Emma",
    "Lucas",
    "Mia",
    "Oscar",
)
LAST_NAMES = (
    "Silva",
    "Santos",
    "Tanaka",
    "Smith",
    "Jones",
    "Müller",
    "Costa",
    "Sato",
    "Brown",
    "Garcia",
    "Wilson",
    "Ferreira",
    "Suzuki",
    "Taylor",
    "Martin",
    "Lopez",
    "Schmidt",
)

WEEKDAY_DEMAND = (0.75, 0.9, 1.0, 1.1, 1.3, 1.45, 0.6)  # Monday .. Sunday
MONTH_DEMAND = (0.9, 0.9, 1.0, 1.0, 1.05, 1.05, 0.95, 0.85, 1.0, 1.05, 1.1, 1.25)
HOUR_DEMAND = {
    7: 0.5,
    8: 1.5,
    9: 3.0,
    10: 5.0,
    11: 6.0,
    12: 4.0,
    13: 4.0,
    14: 5.0,
    15: 5.0,
    16: 6.0,
    17: 7.0,
    18: 5.0,
    19: 3.0,
    20: 1.5,
}
SLOT_TABLE_SIZE = 512
OUT_OF_HOURS_RATE = 0.015  # bookings up to an hour before opening or just after closing

# Clients: candidates per booking at a salon, Pareto shape and cap of the visit rate, share
# of a salon's clientele that are clients of another salon.
CLIENTS_PER_BOOKING = 0.42
VISIT_RATE_SHAPE = 1.1
VISIT_RATE_CAP = 25.0
SHARED_CLIENT_SHARE = 0.08
AUDITED_BOOKING_RATE = 0.12
DISCOUNT_RATE = 0.1

COPY_BATCH = 4_000  # rows per write to the COPY stream

USER_ROLE_ORDER = {"admin": 0, "owner": 1, "professional": 2, "client": 3}
EMAIL_PREFIX = {"admin": "admin", "owner": "owner", "professional": "pro", "client": "client"}
