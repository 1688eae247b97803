"""Fault injection against real processes: ``make faults``."""
