"""Guest networking on the host side: egress policy, its enforcement, the allow-list proxy and
port forwards."""
