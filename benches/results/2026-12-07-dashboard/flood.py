import http.client, sys, threading
start, count, threads = int(sys.argv[1]), int(sys.argv[2]), 4
def worker(k):
    c = http.client.HTTPConnection("127.0.0.1", 18480)
    for i in range(start + k, start + count, threads):
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        c.request("GET", "/", headers={"Host": "app", "X-Forwarded-For": ip})
        r = c.getresponse(); r.read()
ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
