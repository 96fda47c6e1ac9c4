"""The official release layouts `lamscale shards build --format` reads. A module of its own so that the
command line can list them without importing the builders (webdataset, torch: seconds per command)."""

FORMAT_NAMES = ("qvhighlights", "mad", "madv2_ad", "imagefolder", "msrvtt", "idx")
