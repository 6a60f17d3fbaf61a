from harness.run import main

main()
