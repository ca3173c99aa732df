"""Ops stage: the runtime functions that rewritten decoder graphs call (row layout, sliced FFN, hollow attention)."""
