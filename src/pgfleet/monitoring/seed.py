"""The seed guide's two monitoring queries, verbatim. They must keep running
unchanged against the platform DB (tests and bench/stats.py run them)."""

REGION_DISTRIBUTION = """
SELECT region, COUNT(*) as tenant_count,
       COUNT(*) FILTER (WHERE plan_type = 'free') as free_count,
       COUNT(*) FILTER (WHERE plan_type != 'free') as paid_count
FROM tenants
GROUP BY region
ORDER BY tenant_count DESC;
"""

REGIONAL_PERFORMANCE = """
SELECT
  t.region,
  AVG(q.execution_time_ms) as avg_query_time_ms,
  COUNT(*) as query_count
FROM query_logs q
JOIN tenants t ON q.tenant_id = t.id
WHERE q.executed_at > NOW() - INTERVAL '24 hours'
GROUP BY t.region;
"""
