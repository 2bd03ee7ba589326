{
  "targets": [
    {
      "target_name": "qcow_host",
      "sources": ["native/qcow_host.c", "native/copy_loop.c", "native/compare_loop.c", "native/pool_job.c"],
      "conditions": [["OS!='linux'", {"type": "none"}]],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-ldl", "-lpthread"]
    }
  ]
}
