"""Tables and figures for people: summary.md and the PNG figures."""
