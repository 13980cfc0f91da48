"""Query logs, fleet statistics, the expansion advisor and cost estimates."""
