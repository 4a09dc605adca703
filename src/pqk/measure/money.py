"""Device time as money: the hourly rate every cost figure uses unless the user gives one."""

DEFAULT_RATE_USD_PER_H = 6.88  # the user's plan (document 000): an H100 at $6.88/h
