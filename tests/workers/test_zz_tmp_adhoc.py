def test_ray(ray_cluster):
    import ray
    @ray.remote
    def f(x):
        import os, workers.storage
        return x * 2, workers.storage.__file__, os.environ.get("PYTHONPATH")
    print("RAY", ray.get(f.remote(21)), ray_cluster.dashboard_url)
    from ray.util.state import list_nodes
    print("STATE", len(list_nodes()))
