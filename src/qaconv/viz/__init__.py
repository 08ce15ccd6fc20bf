"""Pictures: curves, match drawings, reports."""
