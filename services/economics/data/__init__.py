"""Versioned economics data shipped with epserve: the default price table and DeepSeek's day-6 figures."""
