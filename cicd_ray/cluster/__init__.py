"""The Ray edge on the client's side: joining or starting a cluster and finding the master
(`session`), `cicd-ray up` and `down` (`up`), a local autoscaling cluster (`local`), the KubeRay
manifests (`kuberay`, which imports no Ray).
"""
