def main() -> int:
    raise SystemExit("coset: the command is not written yet")
