"""routing: arrives with its own issue; the package exists so the layout of DESIGN.md holds."""
