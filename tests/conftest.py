import os

# Ray 2.60 enables token auth by default and writes ~/.ray; tests run local clusters only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
