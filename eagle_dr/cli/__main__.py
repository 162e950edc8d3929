"""``python -m eagle_dr.cli``: how the lab starts its workers."""

from eagle_dr.cli import main

main()
