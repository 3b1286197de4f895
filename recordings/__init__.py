"""recordings: arrives with its own issue (see the issue tracker); the package exists so the layout of DESIGN.md holds."""
