"""What the daemon counts about itself, for Prometheus (DESIGN.md section 10).

    counters.py   NodeStats: thread-safe counters and histogram buckets the node, its tiers and
                  the cluster code update where requests, loads, evictions and migrations end
    collector.py  NodeCollector: a prometheus_client collector that reads NodeStats, the tiers and
                  the native loader counters at scrape time (no sampling thread)
"""
