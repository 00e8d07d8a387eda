"""The file users write: its models (`model`), loading YAML or an object with every problem
named (`load`, `yamldoc`), the graph checks and matrix expansion that make a plan (`graph`), the
`if:` language (`conditions`) and cache-key templates (`cachekeys`). Pure: imports only
`errors`.
"""
