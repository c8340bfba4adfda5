"""Showing results: terminal tables, PNG plots, self-contained HTML pages and reports, the side-by-side chat."""
