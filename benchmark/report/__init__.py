"""Reports built from result records only: paper tables (Markdown, LaTeX, HTML, CSV) with published
reference rows, and the regression comparison and baselines of checkpoint CI."""
