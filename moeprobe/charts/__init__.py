"""Pictures of a trace: Vega-Lite specs of the report's charts (``specs``), rendered as a self-contained HTML page
(``documents``, ``page``) or as PNG/SVG files and inline SVG for notebooks (``render``, via vl-convert).

Charts are built from the analysis results in their JSON form, never from new queries. Importing this package
imports nothing heavy; vl-convert is loaded only when something is rendered (``pip install 'moeprobe[html]'``).
"""
