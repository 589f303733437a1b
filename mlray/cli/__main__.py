from mlray.cli import main

main()
