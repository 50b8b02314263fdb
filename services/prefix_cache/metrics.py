"""Prometheus metrics of the prefix cache (read bandwidth = rate(bytes read) / rate(read seconds))."""

from prometheus_client import Counter, Gauge

BYTES_WRITTEN = Counter("epserve_prefix_cache_bytes_written_total", "page-file bytes written to disk")
PAGES_WRITTEN = Counter("epserve_prefix_cache_pages_written_total", "pages written to disk")
WRITES_SKIPPED = Counter("epserve_prefix_cache_writes_skipped_total",
                         "disk writes not done, by reason (resident, orphan)", ["reason"])
BYTES_READ = Counter("epserve_prefix_cache_bytes_read_total", "page-file bytes read from disk")
PAGES_READ = Counter("epserve_prefix_cache_pages_read_total", "verified pages read from disk")
READ_SECONDS = Counter("epserve_prefix_cache_read_seconds_total",
                       "time spent reading and verifying pages from disk")
EVICTIONS = Counter("epserve_prefix_cache_evictions_total", "pages evicted from disk")
CORRUPT_PAGES = Counter("epserve_prefix_cache_corrupt_pages_total",
                        "page files found damaged and quarantined, by reason", ["reason"])
REMOVE_ERRORS = Counter("epserve_prefix_cache_remove_errors_total",
                        "page files that could not be removed (eviction or quarantine)")
RESIDENT_BYTES = Gauge("epserve_prefix_cache_resident_bytes",
                       "bytes of pages this instance holds, by tier", ["tier"])
LOOKUP_TOKENS = Counter("epserve_prefix_cache_lookup_tokens_total",
                        "prompt tokens looked up, by where they came from (memory, disk, miss)",
                        ["source"])
DISK_SKIPPED = Counter("epserve_prefix_cache_disk_reads_skipped_total",
                       "lookups that stopped before the disk because recomputing was faster")
