"""Consistency checks: PostgreSQL tables compared by primary-key ranges (hashed set-wise on both
sides, bisected down to exact keys), and Redis master vs replica."""
