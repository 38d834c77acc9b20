"""The model zoo: generative models of calorimeter showers behind one registry and one interface.

Filled by the zoo issue: one file per model family, variants registered by name.
"""
