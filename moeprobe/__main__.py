from moeprobe.cli.main import entry

entry()
