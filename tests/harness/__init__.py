"""The one test harness: worker processes (process.py), waiting (waiting.py), response checks (asserts.py) and
job helpers (jobs.py). Conftests hold fixtures only; the older modules (tests/unit/support.py,
tests/production/conftest.py, tests/clients.py) re-export these names."""
